"""jobd: run Linux commands for remote clients, each job in its own cgroup.

`jobd.engine` owns jobs, cgroups and output and knows nothing of the network;
`jobd.server` adapts it to the gRPC API (`jobd.v1`, generated) over mutual TLS.
"""

# The one place the version is written: pyproject.toml reads it from here (setuptools
# `dynamic`), `jobd --version` and the jobd_build_info metric print it.
__version__ = "0.2.0.dev0"
