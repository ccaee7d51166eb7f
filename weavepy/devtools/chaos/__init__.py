"""Chaos runs against a sandboxed weavepy cluster: fault schedules, the live checker, the runner.

`schedule` says what goes wrong and when (seeded or scripted), `checker` decides from
observations alone whether the invariants held (sans-IO: fed snapshots and times), and
`runner` wires both to a real sandbox with agents, pods and probes.
"""
