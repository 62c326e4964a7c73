"""Sender rules, spool, scheduler and outbound relaying."""
