"""Engines as servers: their environments (install, resolve), the launcher, the HTTP and OpenAI streaming
client, the shared server backend and the /metrics scraper (each engine plugin hands in its table).
"""
