"""The operator's side and the composition root: the admin API (routers over one service layer that every
configuration write goes through), the command line, the bootstrap of `serve`, the ONE API importer, and
admin.app, which adds all of it to the gateway's core (relay.app). Nothing in relay/, channels/ or backends/
imports it."""
