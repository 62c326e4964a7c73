"""
The OpenAPI 3.0 description of the admin API, served at
C{GET /api/v1/openapi.json}.

It is built from the declarations the API enforces, so that it cannot
drift from them: the user fields' schemas (patterns and bounds included)
come from L{smtpplus.model.User}, whose checks in L{smtpplus.auth.users}
admit exactly those values; enumerations from the enums the code uses.  A
schema fuzz run against the real daemon (tests.test_admin_schemathesis)
holds both sides to it: every answer validates, every admitted request is
accepted, every other one refused.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import attrs

from smtpplus.model import (
    ADDRESS_PATTERN,
    DKIM_ALGORITHMS,
    DKIM_DEFAULT_ALGORITHM,
    DKIM_DEFAULT_SELECTOR,
    DKIM_SELECTOR_PATTERN,
    DOMAIN_PATTERN,
    USER_TIMESTAMPS,
    Aggregation,
    EventType,
    MessageStatus,
    RecipientStatus,
    User,
    anchored,
)
from smtpplus.paging import CURSOR_PATTERN

MAX_LIMIT = 1000
# A user object nests two levels; anything far deeper is an attack on the
# parser (the stdlib decoder recurses and would end in RecursionError).
MAX_DEPTH = 32

def _values(choices: type[StrEnum]) -> list[str]:
    return [choice.value for choice in choices]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_ERRORS = {
    "400": _error("Validation error; the message names the field or parameter."),
    "401": _error("Missing or wrong bearer token."),
    "503": _error('The store cannot be reached (code "store_unavailable"); the daemon reconnects by itself.'),
}
_BODY_ERRORS = {
    **_ERRORS,
    "400": _error(
        f"Validation error; the message names the field. Also a body nested deeper than {MAX_DEPTH} levels,"
        " or a string holding NUL or a lone surrogate (neither can be stored)."
    ),
    "413": _error("Request body too large."),
    "415": _error("Body is not JSON (or Content-Type is not application/json)."),
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_USERNAME_PARAM = {
    "name": "username",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The username (case-insensitive).",
}

_USER_PROPERTIES: dict[str, Any] = {field.name: dict(field.metadata["schema"]) for field in attrs.fields(User)}

# What a create request may hold: the writable fields, each as its input
# takes it (a list also as one ";"-separated string).
_USER_INPUT_PROPERTIES: dict[str, Any] = {
    field.name: dict(field.metadata.get("input", field.metadata["schema"]))
    for field in attrs.fields(User)
    if field.name not in USER_TIMESTAMPS
}
# The username is the key: a change request names the user in its path only.
_USER_PATCH_PROPERTIES = {name: schema for name, schema in _USER_INPUT_PROPERTIES.items() if name != "username"}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "Settings": {
        "type": "object",
        "required": [
            "hostname",
            "ports",
            "listening_ports",
            "tls_ports",
            "listening_tls_ports",
            "encryption",
            "auth_mechanisms",
        ],
        "properties": {
            "hostname": {"type": "string"},
            "ports": {"type": "string", "description": "Configured STARTTLS port spec."},
            "listening_ports": {"type": "array", "items": {"type": "integer"}},
            "tls_ports": {"type": "string", "description": "Configured implicit-TLS port spec."},
            "listening_tls_ports": {"type": "array", "items": {"type": "integer"}},
            "encryption": {"type": "string", "enum": ["STARTTLS"]},
            "auth_mechanisms": {"type": "array", "items": {"type": "string"}},
            "workers": {
                "type": "array",
                "description": "The processes serving SMTP sessions: the SMTP workers, or one entry with index 0 "
                "for the single daemon process ([server] workers = 1).",
                "items": {
                    "type": "object",
                    "required": ["index", "pid", "serving"],
                    "properties": {
                        "index": {"type": "integer", "minimum": 0},
                        "pid": {"type": "integer", "nullable": True},
                        "serving": {"type": "boolean"},
                        "sessions": {"type": "integer", "minimum": 0},
                        "restarts": {"type": "integer", "minimum": 0},
                    },
                },
            },
        },
    },
    "User": {
        "type": "object",
        "required": list(_USER_PROPERTIES),
        "additionalProperties": False,
        "properties": _USER_PROPERTIES,
    },
    "UserCreate": {
        "type": "object",
        "additionalProperties": False,
        "description": "Any writable user field; username is generated (smtp-xxxxxxxx) when absent.",
        "properties": _USER_INPUT_PROPERTIES,
    },
    "UserPatch": {
        "type": "object",
        "additionalProperties": False,
        "description": "The fields to change; the username cannot change.",
        "properties": _USER_PATCH_PROPERTIES,
    },
    "UserWithPassword": {
        "type": "object",
        "required": [*_USER_PROPERTIES, "password"],
        "additionalProperties": False,
        "properties": {
            **_USER_PROPERTIES,
            "password": {"type": "string", "description": "Shown once, never again."},
        },
    },
    "Password": {
        "type": "object",
        "required": ["username", "password"],
        "additionalProperties": False,
        "properties": {
            "username": {"type": "string"},
            "password": {"type": "string", "description": "Shown once; the old password stops working."},
        },
    },
    "UserList": {
        "type": "object",
        "required": ["users"],
        "properties": {"users": {"type": "array", "items": _ref("User")}},
    },
    "Recipient": {
        "type": "object",
        "required": ["address", "status", "attempts", "last_response"],
        "properties": {
            "address": {"type": "string"},
            "status": {"type": "string", "enum": _values(RecipientStatus)},
            "attempts": {"type": "integer", "minimum": 0},
            "last_response": {"type": "string", "nullable": True},
        },
    },
    "Message": {
        "type": "object",
        "required": [
            "id",
            "user",
            "mail_from",
            "header_from",
            "subject",
            "priority",
            "size",
            "status",
            "recipients",
            "campaign_code",
            "created_at",
            "updated_at",
            "next_attempt_at",
            "duplicates",
        ],
        "properties": {
            "id": {"type": "string"},
            "user": {
                "type": "string",
                "nullable": True,
                "description": "Null for the daemon's own mail (notification mail); a bounce has its sender's.",
            },
            "mail_from": {"type": "string", "description": 'Empty for the null sender "<>" of a bounce.'},
            "header_from": {"type": "string", "nullable": True},
            "subject": {"type": "string", "nullable": True},
            "priority": {"type": "integer", "minimum": 1, "maximum": 5},
            "size": {"type": "integer", "minimum": 0, "description": "Bytes of the message as queued."},
            "status": {"type": "string", "enum": _values(MessageStatus)},
            "recipients": {"type": "array", "items": _ref("Recipient")},
            "campaign_code": {"type": "string", "nullable": True},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "next_attempt_at": {
                "type": "string",
                "format": "date-time",
                "nullable": True,
                "description": "When the next attempt is due (queued, scheduled, deferred); null while sending and once final.",
            },
            "duplicates": {
                "type": "integer",
                "minimum": 0,
                "description": "How many resent copies (same user, Message-ID and recipients within [delivery]"
                " dedup_window) were answered with this message's id instead of being queued.",
            },
        },
    },
    "MessageList": {
        "type": "object",
        "required": ["messages", "next_cursor"],
        "properties": {"messages": {"type": "array", "items": _ref("Message")}, "next_cursor": _ref("NextCursor")},
    },
    "NextCursor": {
        "type": "string",
        "nullable": True,
        "pattern": CURSOR_PATTERN,
        "description": "Pass as cursor= to get the next page; null on the last page.",
    },
    "Event": {
        "type": "object",
        "required": ["id", "type", "user", "message_id", "detail", "created_at"],
        "properties": {
            "id": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            "type": {"type": "string", "enum": _values(EventType)},
            "user": {"type": "string", "nullable": True},
            "message_id": {"type": "string", "nullable": True},
            "detail": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "EventList": {
        "type": "object",
        "required": ["notifications", "next_cursor"],
        "properties": {
            "notifications": {"type": "array", "items": _ref("Event")},
            "next_cursor": _ref("NextCursor"),
        },
    },
    "StatsGroup": {
        "type": "object",
        "required": ["key", "messages", "recipients", "sent", "deferred", "bounced", "rejected"],
        "properties": {
            "key": {"type": "string"},
            **{
                name: {"type": "integer", "minimum": 0}
                for name in ("messages", "recipients", "sent", "deferred", "bounced", "rejected")
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "additionalProperties": False,
        "properties": {
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "reason": {"type": "string", "description": "What is wrong, when unavailable."},
        },
    },
    "Stats": {
        "type": "object",
        "required": ["policy", "groups"],
        "properties": {
            "policy": {"type": "string", "enum": _values(Aggregation)},
            "groups": {"type": "array", "items": _ref("StatsGroup")},
        },
    },
}

# Contract section 8: each user's suppressed recipients.
SCHEMAS.update(
    {
        "Suppression": {
            "type": "object",
            "required": ["address", "reason", "created_at"],
            "additionalProperties": False,
            "properties": {
                "address": {"type": "string", "description": "Lower-cased; an international domain as IDNA A-labels."},
                "reason": {"type": "string", "description": "The next hop's reply, or the administrator's reason."},
                "created_at": {"type": "string", "format": "date-time"},
            },
        },
        "SuppressionList": {
            "type": "object",
            "required": ["suppressions"],
            "properties": {"suppressions": {"type": "array", "items": _ref("Suppression")}},
        },
        "SuppressionCreate": {
            "type": "object",
            "required": ["address"],
            "additionalProperties": False,
            "properties": {
                "address": {"type": "string", "pattern": anchored(ADDRESS_PATTERN)},
                "reason": {"type": "string", "maxLength": 1000, "description": 'Default "added by an administrator".'},
            },
        },
    }
)


def _suppression_paths() -> dict[str, Any]:
    """The suppression list's operations."""
    return {
        "/api/v1/users/{username}/suppressions": {
            "parameters": [_USERNAME_PARAM],
            "get": {
                "operationId": "listSuppressions",
                "summary": "The user's suppressed recipients, by address",
                "responses": {
                    "200": _json(_ref("SuppressionList"), "The suppressions."),
                    **_ERRORS,
                    "404": _error("No such user."),
                },
            },
            "post": {
                "operationId": "addSuppression",
                "summary": "Suppress a recipient for the user (whatever suppress_hard_bounces says)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("SuppressionCreate")}}},
                "responses": {
                    "201": _json(_ref("Suppression"), "The suppression (an address suppressed already takes the new reason and date)."),
                    **_BODY_ERRORS,
                    "404": _error("No such user."),
                },
            },
        },
        "/api/v1/users/{username}/suppressions/{address}": {
            "parameters": [_USERNAME_PARAM, {"name": "address", "in": "path", "required": True, "schema": {"type": "string"}}],
            "delete": {
                "operationId": "removeSuppression",
                "summary": "Lift a suppression",
                "responses": {
                    "204": {"description": "Lifted."},
                    **_ERRORS,
                    "404": _error("No such user, or the address is not suppressed."),
                },
            },
        },
    }


_LIMIT = _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "At most this many (default 100).")
_USER_FILTER = _query("user", {"type": "string"}, "Only this user's.")
_CURSOR = _query(
    "cursor",
    {"type": "string", "pattern": CURSOR_PATTERN},
    "The next_cursor of the previous page: the items after it. Pages are stable: new items do not shift them.",
)
_MESSAGE_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


_DKIM_DOMAIN = {
    "name": "domain",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The sender domain; a Unicode name is taken as its IDNA A-labels, as the users' domains.",
}
SCHEMAS.update(
    {
        "DKIMKey": {
            "type": "object",
            "required": ["domain", "selector", "algorithm", "dns_name", "dns_txt", "enabled", "created_at"],
            "properties": {
                "domain": {"type": "string"},
                "selector": {"type": "string"},
                "algorithm": {"type": "string", "enum": list(DKIM_ALGORITHMS)},
                "dns_name": {"type": "string", "description": "<selector>._domainkey.<domain>: where to publish."},
                "dns_txt": {"type": "string", "description": "The whole TXT record value, as one string."},
                "enabled": {"type": "boolean", "description": "Messages whose From: domain is this are signed."},
                "created_at": {"type": "string", "format": "date-time"},
            },
        },
        "DKIMKeyList": {
            "type": "object",
            "required": ["keys"],
            "properties": {"keys": {"type": "array", "items": _ref("DKIMKey")}},
        },
        "DKIMKeyCreate": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "string",
                    "pattern": anchored(DKIM_SELECTOR_PATTERN),
                    "maxLength": 253,
                    "default": DKIM_DEFAULT_SELECTOR,
                },
                "algorithm": {"type": "string", "enum": list(DKIM_ALGORITHMS), "default": DKIM_DEFAULT_ALGORITHM},
            },
        },
        "DKIMKeyPatch": {
            "type": "object",
            "additionalProperties": False,
            "required": ["enabled"],
            "properties": {"enabled": {"type": "boolean"}},
        },
        "PolicyCheck": {
            "type": "object",
            "additionalProperties": False,
            "required": ["mail_from", "recipients"],
            "properties": {
                "mail_from": {"type": "string", "description": "The envelope sender; empty for the null sender."},
                "header_from": {
                    "type": "string",
                    "pattern": "^[^\\r\\n\\u0000]*$",
                    "description": "The From: header value (added before the headers' own fields).",
                },
                "recipients": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1000,
                    "items": {"type": "string", "minLength": 1},
                },
                "headers": {
                    "type": "object",
                    "description": "Header fields by name: a string, or a list of strings for a field given"
                    " several times.",
                    "additionalProperties": {
                        "oneOf": [
                            {"type": "string", "pattern": "^[^\\r\\n\\u0000]*$"},
                            {"type": "array", "items": {"type": "string", "pattern": "^[^\\r\\n\\u0000]*$"}},
                        ]
                    },
                },
            },
        },
        "PolicyAnswer": {
            "type": "object",
            "required": ["accepted", "reply", "reasons", "effective_priority"],
            "properties": {
                "accepted": {"type": "boolean", "description": "The message would be queued for a recipient at least."},
                "reply": {"type": "string", "description": "The SMTP reply that decides, e.g. 550 5.7.1 ..."},
                "reasons": {"type": "array", "items": {"type": "string"}},
                "effective_priority": {"type": "integer", "minimum": 1, "maximum": 5, "nullable": True},
                "recipients": {
                    "type": "array",
                    "description": "With several recipients: each one's RCPT TO reply.",
                    "items": {
                        "type": "object",
                        "required": ["address", "accepted", "reply"],
                        "properties": {
                            "address": {"type": "string"},
                            "accepted": {"type": "boolean"},
                            "reply": {"type": "string"},
                        },
                    },
                },
            },
        },
    }
)


def _beyond_paths() -> dict[str, Any]:
    """The paths of contract section 8's policy dry-run and DKIM keys."""
    no_key = _error("No key for this domain.")
    return {
        "/api/v1/users/{username}/check": {
            "parameters": [_USERNAME_PARAM],
            "post": {
                "operationId": "checkPolicy",
                "summary": "Dry-run: what an SMTP session of this user would answer, and why; nothing is queued",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("PolicyCheck")}}},
                "responses": {
                    "200": _json(_ref("PolicyAnswer"), "The answer."),
                    **_BODY_ERRORS,
                    "404": _error("No such user."),
                },
            },
        },
        "/api/v1/dkim": {
            "get": {
                "operationId": "listDKIMKeys",
                "summary": "The DKIM keys, by domain (never the private keys)",
                "responses": {"200": _json(_ref("DKIMKeyList"), "The keys."), **_ERRORS},
            }
        },
        "/api/v1/dkim/{domain}": {
            "parameters": [_DKIM_DOMAIN],
            "post": {
                "operationId": "createDKIMKey",
                "parameters": [
                    {
                        **_DKIM_DOMAIN,
                        "schema": {"type": "string", "pattern": anchored(DOMAIN_PATTERN), "maxLength": 253},
                    }
                ],
                "summary": "Generate a key for a domain (enabled); publish dns_txt at dns_name",
                "requestBody": {"required": False, "content": {"application/json": {"schema": _ref("DKIMKeyCreate")}}},
                "responses": {
                    "201": _json(_ref("DKIMKey"), "The new key."),
                    **_BODY_ERRORS,
                    "409": _error("The domain has a key."),
                },
            },
            "get": {
                "operationId": "getDKIMKey",
                "summary": "One domain's key",
                "responses": {"200": _json(_ref("DKIMKey"), "The key."), **_ERRORS, "404": no_key},
            },
            "patch": {
                "operationId": "updateDKIMKey",
                "summary": "Turn signing with the key on or off",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("DKIMKeyPatch")}}},
                "responses": {"200": _json(_ref("DKIMKey"), "The key."), **_BODY_ERRORS, "404": no_key},
            },
            "delete": {
                "operationId": "deleteDKIMKey",
                "summary": "Remove the key; messages of the domain are no longer signed",
                "responses": {"204": {"description": "Deleted."}, **_ERRORS, "404": no_key},
            },
        },
    }


SCHEMAS.update(
    {
        "Node": {
            "type": "object",
            "required": ["name", "workers", "started_at", "last_seen", "queued", "sending"],
            "properties": {
                "name": {"type": "string", "description": "[server] node_name, else the hostname."},
                "workers": {"type": "integer", "minimum": 1, "description": "Its SMTP processes."},
                "started_at": {"type": "string", "format": "date-time"},
                "last_seen": {"type": "string", "format": "date-time", "description": "Its last heartbeat."},
                "queued": {"type": "integer", "minimum": 0, "description": "Its messages waiting (queued, scheduled, deferred)."},
                "sending": {"type": "integer", "minimum": 0, "description": "Its messages in a delivery attempt."},
            },
        },
        "NodeList": {
            "type": "object",
            "required": ["nodes"],
            "properties": {"nodes": {"type": "array", "items": _ref("Node")}},
        },
    }
)


def _node_paths() -> dict[str, Any]:
    """The nodes sharing the store (contract section 5)."""
    return {
        "/api/v1/nodes": {
            "get": {
                "operationId": "listNodes",
                "summary": "The nodes sharing this store, by name (one for sqlite)",
                "responses": {"200": _json(_ref("NodeList"), "The nodes."), **_ERRORS},
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    """The whole OpenAPI 3.0 document."""
    # No body at all creates a user with every default ("curl -X POST").
    user_body = {"required": False, "content": {"application/json": {"schema": _ref("UserCreate")}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "smtpplus admin API",
            "version": "1",
            "description": "Users, messages, notifications and statistics of an smtpplus relay. "
            "Every request but GET /health needs Authorization: Bearer <token>.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
        "paths": {
            "/health": {
                "get": {
                    "operationId": "getHealth",
                    "summary": "Whether the store answers and an SMTP port is listening; no token needed",
                    "security": [],
                    "responses": {
                        "200": _json(_ref("Health"), 'Healthy: {"status": "ok"}.'),
                        "503": _json(_ref("Health"), "Unavailable; reason says why."),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "getMetrics",
                    "summary": "Prometheus metrics in the text exposition format",
                    "responses": {
                        "200": {
                            "description": "The metrics, as prometheus_client writes them.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _ERRORS["401"],
                    },
                }
            },
            "/api/v1/settings": {
                "get": {
                    "operationId": "getSettings",
                    "summary": "Client configuration data",
                    "responses": {"200": _json(_ref("Settings"), "The settings."), **_ERRORS},
                }
            },
            "/api/v1/users": {
                "get": {
                    "operationId": "listUsers",
                    "summary": "All users, enabled and disabled",
                    "responses": {"200": _json(_ref("UserList"), "The users."), **_ERRORS},
                },
                "post": {
                    "operationId": "createUser",
                    "summary": "Create a user; the generated password is returned once",
                    "requestBody": user_body,
                    "responses": {
                        "201": _json(_ref("UserWithPassword"), "The new user and its password."),
                        **_BODY_ERRORS,
                        "409": _error("The username exists."),
                    },
                },
            },
            "/api/v1/users/{username}": {
                "parameters": [_USERNAME_PARAM],
                "get": {
                    "operationId": "getUser",
                    "summary": "One user",
                    "responses": {"200": _json(_ref("User"), "The user."), **_ERRORS, "404": _error("No such user.")},
                },
                "patch": {
                    "operationId": "updateUser",
                    "summary": "Change writable fields",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("UserPatch")}}},
                    "responses": {
                        "200": _json(_ref("User"), "The changed user."),
                        **_BODY_ERRORS,
                        "404": _error("No such user."),
                    },
                },
                "delete": {
                    "operationId": "deleteUser",
                    "summary": "Delete a user; it can no longer authenticate",
                    "responses": {"204": {"description": "Deleted."}, **_ERRORS, "404": _error("No such user.")},
                },
            },
            "/api/v1/users/{username}/password": {
                "parameters": [_USERNAME_PARAM],
                "post": {
                    "operationId": "regeneratePassword",
                    "summary": "Generate a new password; the old one stops working at once",
                    "responses": {
                        "200": _json(_ref("Password"), "The new password, shown once."),
                        **_ERRORS,
                        "404": _error("No such user."),
                    },
                },
            },
            "/api/v1/messages": {
                "get": {
                    "operationId": "listMessages",
                    "summary": "Messages, newest first",
                    "parameters": [
                        _USER_FILTER,
                        _query("status", {"type": "string", "enum": _values(MessageStatus)}, "Only this status."),
                        _query(
                            "recipient",
                            {"type": "string"},
                            "Only messages to this address (ASCII letters compared case-insensitively).",
                        ),
                        _query("campaign_code", {"type": "string"}, "Only this X-SMTPAPI CampaignCode."),
                        _query(
                            "since",
                            {"type": "string", "format": "date-time"},
                            "Only messages created at or after this time (ISO 8601 with Z or an offset).",
                        ),
                        _query(
                            "until",
                            {"type": "string", "format": "date-time"},
                            "Only messages created before this time (ISO 8601 with Z or an offset).",
                        ),
                        _LIMIT,
                        _CURSOR,
                    ],
                    "responses": {"200": _json(_ref("MessageList"), "The messages."), **_ERRORS},
                }
            },
            "/api/v1/messages/{id}": {
                "parameters": [_MESSAGE_ID],
                "get": {
                    "operationId": "getMessage",
                    "summary": "One message",
                    "responses": {
                        "200": _json(_ref("Message"), "The message."),
                        **_ERRORS,
                        "404": _error("No such message."),
                    },
                },
                "delete": {
                    "operationId": "deleteMessage",
                    "summary": "Drop a message that is not final: status deleted, its spool file removed",
                    "responses": {
                        "200": _json(_ref("Message"), "The deleted message."),
                        **_ERRORS,
                        "404": _error("No such message."),
                        "409": _error("The message is final (sent, bounced, partial, deleted) or being sent."),
                    },
                },
            },
            "/api/v1/messages/{id}/retry": {
                "parameters": [_MESSAGE_ID],
                "post": {
                    "operationId": "retryMessage",
                    "summary": "Try a message now: a deferred one's retry and a scheduled one's hold are cut short",
                    "responses": {
                        "200": _json(_ref("Message"), "The message, due now (queued or sending: unchanged)."),
                        **_ERRORS,
                        "404": _error("No such message."),
                        "409": _error("The message is final (sent, bounced, partial, deleted)."),
                    },
                },
            },
            "/api/v1/notifications": {
                "get": {
                    "operationId": "listNotifications",
                    "summary": "Notification events, newest first",
                    "parameters": [
                        _query("type", {"type": "string", "enum": _values(EventType)}, "Only this event type."),
                        _USER_FILTER,
                        _LIMIT,
                        _CURSOR,
                    ],
                    "responses": {"200": _json(_ref("EventList"), "The events."), **_ERRORS},
                }
            },
            "/api/v1/stats": {
                "get": {
                    "operationId": "getStats",
                    "summary": "Statistics grouped by an aggregation policy",
                    "parameters": [
                        _USER_FILTER,
                        _query(
                            "policy",
                            {"type": "string", "enum": _values(Aggregation)},
                            "Grouping; default the user's aggregation, or day.",
                        ),
                    ],
                    "responses": {"200": _json(_ref("Stats"), "The statistics."), **_ERRORS},
                }
            },
            **_beyond_paths(),
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "getOpenAPI",
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "The OpenAPI document."), **_ERRORS},
                }
            },
            **_suppression_paths(),
            **_node_paths(),
        },
    }
