# Sourced by benchmarks: daemon_host_pid BOX PID1 prints the host PID of caretaker.service's main
# process in lab box BOX (whose systemd is host PID PID1), or fails.
daemon_host_pid() {
    local box=$1 pid1=$2 inner box_ns p
    inner=$(dev/lab exec "$box" systemctl show -P MainPID caretaker.service)
    box_ns=$(readlink "/proc/$pid1/ns/pid")
    for p in $(pgrep -x caretaker); do
        [ "$(readlink "/proc/$p/ns/pid" 2>/dev/null)" = "$box_ns" ] || continue
        if [ "$(awk '/^NSpid:/ {print $NF}' "/proc/$p/status")" = "$inner" ]; then
            echo "$p"
            return 0
        fi
    done
    echo "cannot find the daemon's host PID" >&2
    return 1
}
