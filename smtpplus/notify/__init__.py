"""Notification events and statistics."""
