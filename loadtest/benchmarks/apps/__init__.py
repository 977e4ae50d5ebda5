"""The serving benchmark's baseline apps, each an ASGI factory for ``uvicorn --factory``.

They read what they serve from ``BENCH_*`` environment variables (see each module).
"""
