"""The service's ground floor: settings, database, tables and errors. Imports nothing else of the service."""
