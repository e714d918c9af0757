"""The running service: supervisor, lifecycle, control socket, and (later) sampler, trips, rules, access."""
