"""The Klein REST admin API."""
