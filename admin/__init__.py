"""The admin API (Bearer RELAY_ADMIN_TOKEN); the dashboard will live here too."""
