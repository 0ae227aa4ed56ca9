"""The paged engine: synchronous, single-threaded, no aiohttp (DESIGN.md)."""
