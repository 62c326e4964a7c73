"""
SMTP worker processes: the coordinator (the twistd process) binds the ports
and owns the queue; the workers serve the sessions (see ARCHITECTURE.md).
"""
