"""Rows in, rows out (HTTP-free): datasets and jobs, including claims, leases and their hand-back."""
