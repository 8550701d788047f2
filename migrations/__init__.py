"""Alembic environment for policy-relay (run through `policy-relay db upgrade`)."""
