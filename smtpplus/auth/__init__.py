"""Users, credentials, brute-force throttling."""
