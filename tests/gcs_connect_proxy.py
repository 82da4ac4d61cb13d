"""The https side of the test Cloud Storage: `python gcs_connect_proxy.py LISTEN_PORT TARGET_PORT
CERT KEY`.

tf.io.gfile reaches Cloud Storage at fixed https URLs (www.googleapis.com,
storage.googleapis.com). With ``https_proxy`` pointing here, each CONNECT it sends is answered,
TLS is ended with a certificate for those names (signed by the test CA that ``CURL_CA_BUNDLE``
names), and its HTTP requests go on to the emulator's plain HTTP port with
``X-Forwarded-Proto: https`` (the emulator then returns https upload URLs, which come back here).
One header is dropped on the way: ``Transfer-Encoding: identity``, which TensorFlow puts on empty
POSTs and Cloud Storage ignores, but the emulator's Go HTTP server refuses (501).
"""
import socket
import ssl
import sys
import threading


class _Closed(Exception):
    pass


class _Reader:
    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _Closed
        self.buf += chunk

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(marker, 1)
        return head + marker

    def exactly(self, n: int):
        """Yields the next n bytes in pieces."""
        while n > 0:
            if not self.buf:
                self._fill()
            piece, self.buf = self.buf[:n], self.buf[n:]
            n -= len(piece)
            yield piece


def _pipe_raw(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src, dst)


def _close(*socks) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def _forward_requests(client, upstream) -> None:
    """Copies HTTP/1.1 requests from client to upstream, one at a time, minus the header."""
    reader = _Reader(client)
    try:
        while True:
            head = reader.until(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            kept, length, chunked = [lines[0]], 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == b"transfer-encoding" and value == b"identity":
                    continue
                if name == b"content-length":
                    length = int(value)
                if name == b"transfer-encoding" and b"chunked" in value:
                    chunked = True
                kept.append(line)
            kept.append(b"X-Forwarded-Proto: https")  # so upload URLs it returns stay https
            upstream.sendall(b"\r\n".join(kept) + b"\r\n\r\n")
            if chunked:
                while True:
                    size_line = reader.until(b"\r\n")
                    upstream.sendall(size_line)
                    size = int(size_line.split(b";")[0].strip(), 16)
                    for piece in reader.exactly(size + 2):
                        upstream.sendall(piece)
                    if size == 0:
                        break
            else:
                for piece in reader.exactly(length):
                    upstream.sendall(piece)
    except (_Closed, OSError, ValueError):
        pass
    finally:
        _close(client, upstream)


def _serve(client: socket.socket, target_port: int, tls: ssl.SSLContext) -> None:
    try:
        reader = _Reader(client)
        head = reader.until(b"\r\n\r\n")
        if not head.startswith(b"CONNECT "):
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return _close(client)
        try:
            upstream = socket.create_connection(("127.0.0.1", target_port), timeout=5)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return _close(client)
        upstream.settimeout(None)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        secure = tls.wrap_socket(client, server_side=True)
        threading.Thread(target=_pipe_raw, args=(upstream, secure), daemon=True).start()
        _forward_requests(secure, upstream)
    except (_Closed, OSError):
        _close(client)


def main() -> None:
    listen_port, target_port, cert, key = sys.argv[1:5]
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.set_alpn_protocols(["http/1.1"])
    server = socket.create_server(("127.0.0.1", int(listen_port)), backlog=128)
    while True:
        client, _ = server.accept()
        threading.Thread(target=_serve, args=(client, int(target_port), tls), daemon=True).start()


if __name__ == "__main__":
    main()
