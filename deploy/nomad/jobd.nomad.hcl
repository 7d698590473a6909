# EXAMPLE, not run by this repository's tests or CI: jobd on every Nomad client node, as a
# system job. Adjust the paths, the image or artifact, and the certificates to your cluster;
# read docs/DEPLOY.md ("Under Nomad") first.
#
# jobd must run as root with the host's cgroups and PID view, and build its cgroup tree under
# a cgroup of its own, which is why it uses raw_exec (the task runs as root on the host, in
# the cgroup Nomad gives it) rather than the docker driver. raw_exec must be enabled on the
# clients (plugin "raw_exec" { config { enabled = true } }).

job "jobd" {
  type = "system"   # one allocation per eligible client node

  group "jobd" {
    network {
      port "grpc" { static = 9090 }
      port "metrics" { static = 9091 }
    }

    service {
      name     = "jobd"
      port     = "grpc"
      provider = "nomad"
      # Health over gRPC needs a client certificate; Nomad's built-in grpc check cannot send
      # one, so check the metrics port instead (plain HTTP, bound to the node's address).
      check {
        type     = "http"
        port     = "metrics"
        path     = "/metrics"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "jobd" {
      driver = "raw_exec"
      # SIGTERM, then up to kill_timeout for jobd to stop its jobs (their grace) and exit.
      kill_signal  = "SIGTERM"
      kill_timeout = "90s"

      config {
        # jobd installed on the host (pip install jobd-*.whl into /opt/jobd), see docs/DEPLOY.md.
        command = "/opt/jobd/bin/jobd"
        args    = ["serve"]
      }

      env {
        JOBD_LISTEN         = "${NOMAD_IP_grpc}:9090"
        JOBD_METRICS_LISTEN = "${NOMAD_IP_metrics}:9091"
        JOBD_CERT           = "/etc/jobd/server.pem"   # per node: its own host names
        JOBD_KEY            = "/etc/jobd/server.key"
        JOBD_CLIENT_CA      = "/etc/jobd/ca.pem"
        JOBD_DATA_DIR       = "/var/lib/jobd"          # on the host, survives the allocation
        JOBD_LOG_FORMAT     = "json"
      }

      resources {
        cpu    = 200   # jobd itself; jobs are limited by jobd's own cgroups
        memory = 256
      }
    }
  }
}
