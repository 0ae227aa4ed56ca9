"""Pure wire codecs for berth: parse requests into typed values, render engine events.

No I/O, no torch, no aiohttp: stdlib and orjson only (see DESIGN.md, dependency rule).
"""
