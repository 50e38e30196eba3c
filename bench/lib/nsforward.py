#!/usr/bin/env python3
"""TCP forwarder across network namespaces, for bench/tip.sh: listens on 127.0.0.1:LPORT inside
the network namespace NETNS (a /proc/PID/ns/net path: a lab box's) and forwards every connection,
byte for byte, to HOST:PORT in the namespace it was started in (the host's). So an S3 server on
the host outlives the box that used it, and a second box reaches the same server.

The listening socket is made in the box's namespace (setns on the main thread, before any other
thread exists), then the thread goes back home: the sockets it connects, and the threads it
starts, are in the host's namespace. Prints "ready" once listening."""
import ctypes, os, socket, sys, threading

CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)


def setns(fd):
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "setns: " + os.strerror(e))


netns, lport, host, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
home = os.open("/proc/self/ns/net", os.O_RDONLY)
there = os.open(netns, os.O_RDONLY)
setns(there)
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", lport))
listener.listen(128)
setns(home)
os.close(there)
print("ready", flush=True)


def pump(src, dst):
    try:
        while True:
            b = src.recv(262144)
            if not b:
                break
            dst.sendall(b)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def serve(client):
    try:
        upstream = socket.create_connection((host, port), timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    t.start()
    pump(client, upstream)
    t.join()
    client.close()
    upstream.close()


while True:
    c, _ = listener.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
