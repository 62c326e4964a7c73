"""Database and durable files under state_dir."""
