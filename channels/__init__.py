"""Channel plugins: one adaptor per channel type behind the small interface in channels.base."""
