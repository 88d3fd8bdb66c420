"""Who may call what: TLS for gRPC, bearer tokens, client identities, ZeroMQ CURVE, the one
access table every frontend checks calls against, and the audit log (docs/security.md).

Nothing here imports a frontend; frontends import this package.
"""
