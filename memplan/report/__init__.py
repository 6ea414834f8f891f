"""What memplan shows people: every table and line the commands print, apart from the numbers behind them.

Bytes come in, units go out (`units`: GiB = 2^30, MiB = 2^20); the capabilities gather and return numbers
and never format them themselves.
"""
