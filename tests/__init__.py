"""smtpplus test suite (trial)."""
