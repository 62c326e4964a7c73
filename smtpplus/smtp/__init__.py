"""The ESMTP server: sessions, listeners, TLS."""
