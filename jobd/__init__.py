"""jobd: run Linux commands for remote clients, each job in its own cgroup.

`jobd.engine` owns jobs, cgroups and output and knows nothing of the network;
`jobd.server` adapts it to the gRPC API (`jobd.v1`, generated) over mutual TLS.
"""
