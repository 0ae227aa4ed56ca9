"""aiohttp front end: the only package that imports aiohttp."""
