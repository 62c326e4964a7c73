"""smtpplus: an authenticated SMTP relay in one Twisted daemon."""
