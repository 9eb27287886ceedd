"""A user's opt-out list: corpus items that must never be returned, named by URL, content hash or domain.

Entries are told apart by their form: ``https://…`` (any ``scheme://``) is a URL, 64 hex digits a sha256 of
the stored bytes, anything else a domain, which also covers its subdomains (``example.com`` removes
``cdn.example.com``). URLs match exactly after the scheme and host are lower-cased; hashes in either case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _normal_url(url: str) -> str:
    parts = urlsplit(url.strip())
    return parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl()


@dataclass(frozen=True)
class OptOut:
    urls: frozenset[str]
    hashes: frozenset[str]
    domains: frozenset[str]

    @classmethod
    def parse(cls, entries: tuple[str, ...] | list[str]) -> OptOut:
        urls, hashes, domains = set(), set(), set()
        for raw in entries:
            entry = raw.strip()
            if "://" in entry:
                urls.add(_normal_url(entry))
            elif _SHA256.fullmatch(entry):
                hashes.add(entry.lower())
            else:
                domains.add(entry.lower().lstrip("*.").rstrip("."))
        return cls(frozenset(urls), frozenset(hashes), frozenset(domains))

    def __bool__(self) -> bool:
        return bool(self.urls or self.hashes or self.domains)

    def matches(self, url: str | None, sha256: str | None) -> bool:
        """Whether an item with this source URL and content hash is opted out."""
        if sha256 and sha256.lower() in self.hashes:
            return True
        if not url:
            return False
        if _normal_url(url) in self.urls:
            return True
        host = (urlsplit(url.strip()).hostname or "").rstrip(".")
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels)))
