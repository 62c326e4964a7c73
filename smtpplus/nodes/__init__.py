"""
The nodes sharing one store (contract section 5): this node's heartbeat in
PostgreSQL (L{smtpplus.nodes.heartbeat}) and the list that
C{GET /api/v1/nodes} answers (L{smtpplus.nodes.listing}).
"""
