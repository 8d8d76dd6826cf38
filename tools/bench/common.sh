# Helpers the comparison scripts in tools/bench share (sourced, not run):
# loopback ports, and a throwaway redis-server for the Redis baselines.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# start_redis DIR: redis-server on a free loopback port, nothing persisted,
# its pid in DIR/redis.pid (so a trap that kills DIR/*.pid stops it); sets
# RPORT and RPID once it answers.
start_redis() {
  RPORT=$(free_port)
  redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$1/redis.pid" --logfile "$1/redis.log"
  wait_port "$RPORT" || { echo "redis-server did not start:" >&2; cat "$1/redis.log" >&2; return 1; }
  for _ in $(seq 50); do [ -s "$1/redis.pid" ] && break; sleep 0.1; done
  RPID=$(cat "$1/redis.pid")
}
