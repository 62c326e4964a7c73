from twisted.application.service import ServiceMaker

smtpplus = ServiceMaker("smtpplus", "smtpplus.tap", "Authenticated SMTP relay with priority queueing", "smtpplus")
