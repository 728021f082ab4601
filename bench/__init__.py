"""Herald's load generator and benchmark scenarios (issue 6). See docs/performance.md.

Run ``python -m bench --help``. Nothing here is imported by the product.
"""
