#!/usr/bin/env python3
"""A tiny TCP backend for scripts/demo.sh: greets each connection with
"hello from NAME" and then echoes lines back. Loopback only.

Usage: demo_backend.py NAME PORT
"""
import socket
import sys
import threading


def serve(conn, name):
    # Health checks connect and close at once: a reset here is normal.
    try:
        with conn:
            conn.sendall(f"hello from {name}\n".encode())
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                conn.sendall(data)
    except OSError:
        pass


def main():
    name, port = sys.argv[1], int(sys.argv[2])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(128)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn, name), daemon=True).start()


if __name__ == "__main__":
    main()
