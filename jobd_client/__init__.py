"""The `jobd-client` command line: talks to a jobd server over gRPC with mutual TLS.
Knows only the jobd.v1 API (generated code) and TLS: never the engine or the server.
"""
