"""What the scripts and the tests share to drive the real thing from outside.

- `loopback`: the one address everything listens on and connects to, and free ports;
- `limits`: this process's open-file limit, raised for many connections;
- `procfs`: CPU time, resident memory and open files of a process, and busy time of the
  machine, read from /proc;
- `child_process`: a server in a child process on a loopback port (start, wait until it
  accepts connections, stop, signal);
- `gateway_process`: `gateway serve` in a child process, and the store it runs on;
- `redis_server`: redis-server in a child process;
- `route_bench`: what the benchmarks of the routing workload print and share around their
  runs: the scales of `--quick`, the machine measured, one run's result line;
- `lean_client`: a minimal WebSocket client on a bare socket, cheap enough to generate load.
"""
