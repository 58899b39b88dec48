"""The feature explorer's HTTP API: what it serves, and what it refuses (paths outside its root, big uploads)."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolab.viz.explorer import ExplorerConfig
from dinolab.viz.serve import ServeConfig, make_server

UPLOAD_LIMIT = 3000  # bytes


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _build_folder(base: Path) -> Path:
    """root/{a.png, a_copy.png (same pixels), sub/b.png, notes.txt, link.png -> ../outside.png}."""
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    first.save(root / "a.png")
    first.save(root / "a_copy.png")
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(root / "sub" / "b.png")
    (root / "notes.txt").write_text("not an image")
    first.save(base / "outside.png")
    (root / "link.png").symlink_to(base / "outside.png")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """A running explorer (port 0, in a thread) over :func:`_build_folder`; yields it and the base folder."""
    base = tmp_path_factory.mktemp("explorer")
    root = _build_folder(base)
    cfg = ServeConfig(root=str(root), host="127.0.0.1", port=0, quiet=True,
                      explorer=ExplorerConfig(size=32, max_upload_bytes=UPLOAD_LIMIT, max_selection=3))
    srv = make_server(cfg, model=tiny_model)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, base
    srv.shutdown()
    srv.server_close()


def request(srv, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, str]:
    req = urllib.request.Request(srv.url.rstrip("/") + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def get_json(srv, path: str, **params) -> tuple[int, dict]:
    query = urllib.parse.urlencode(params, doseq=True)
    status, body, ctype = request(srv, path + ("?" + query if query else ""))
    assert ctype == "application/json"
    return status, json.loads(body)


def upload(srv, data: bytes, content_type: str = "image/png") -> tuple[int, dict]:
    status, body, _ = request(srv, "/api/upload", data=data, headers={"Content-Type": content_type})
    return status, json.loads(body)


def test_lists_the_folder_images_only(server):
    srv, _ = server
    status, body = get_json(srv, "/api/images")
    assert status == 200
    assert body["images"] == ["a.png", "a_copy.png", "sub/b.png"]  # no .txt, no symlink leaving the root


@pytest.mark.parametrize(
    "image_id, expected",
    [("../outside.png", 403), ("sub/../../outside.png", 403), ("link.png", 403), ("notes.txt", 415),
     ("missing.png", 404), ("", 400)],
)
def test_refuses_paths_outside_the_root_and_non_images(server, image_id, expected):
    srv, _ = server
    status, body = get_json(srv, "/api/image", id=image_id)
    assert status == expected
    assert body["error"]


def test_refuses_an_absolute_path_outside_the_root(server):
    srv, base = server
    status, body = get_json(srv, "/api/image", id=str(base / "outside.png"))
    assert status == 403
    assert "outside" in body["error"]


def test_serves_the_image_on_the_patch_grid(server):
    srv, _ = server
    status, body, ctype = request(srv, "/api/image?id=sub/b.png")
    assert (status, ctype) == (200, "image/png")
    with Image.open(io.BytesIO(body)) as im:
        assert im.size == (48, 32)  # 32x48 source, shorter side 32, both sides multiples of 8


def test_refuses_an_oversized_upload(server):
    srv, _ = server
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png(Image.fromarray(noise))
    assert len(data) > UPLOAD_LIMIT
    status, body = upload(srv, data)
    assert status == 413
    assert str(UPLOAD_LIMIT) in body["error"]


@pytest.mark.parametrize(
    "data, content_type", [(b"definitely not an image", "image/png"), (b"GIF89a...", "image/gif")]
)
def test_refuses_uploads_that_are_not_accepted_images(server, data, content_type):
    srv, _ = server
    status, body = upload(srv, data, content_type)
    assert status == 415
    assert body["error"]


def test_upload_then_pca_and_similarity(server):
    srv, _ = server
    image = Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8))
    status, body = upload(srv, png(image))
    assert status == 200 and body["id"].startswith("upload:")
    status, pca = get_json(srv, "/api/pca", id=[body["id"], "a.png"])
    assert status == 200
    assert [m["grid"] for m in pca["images"]] == [[4, 4], [4, 4]]
    assert pca["images"][0]["pca_png"].startswith("data:image/png;base64,")


def test_similarity_of_a_patch_with_itself_and_a_copy_is_one(server):
    srv, _ = server
    status, body = get_json(srv, "/api/similarity", src="a.png", row=1, col=2, id=["a.png", "a_copy.png"])
    assert status == 200
    own, copy = (np.array(m["values"]).reshape(m["grid"]) for m in body["maps"])
    assert own[1, 2] == pytest.approx(1.0, abs=1e-4)
    assert own.max() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(copy, own, atol=1e-4)


def test_nearest_neighbour_of_an_image_is_its_copy(server):
    srv, _ = server
    status, body = get_json(srv, "/api/neighbours", id="a.png", k=2)
    assert status == 200
    ids = [n["id"] for n in body["neighbours"]]
    assert ids == ["a_copy.png", "sub/b.png"]  # itself excluded
    assert body["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "path, params",
    [("/api/similarity", {"src": "a.png", "row": 9, "col": 0, "id": "a.png"}),
     ("/api/similarity", {"row": 0, "col": 0, "id": "a.png"}),
     ("/api/similarity", {"src": "a.png", "row": "x", "col": 0, "id": "a.png"}),
     ("/api/pca", {"id": ["a.png", "a_copy.png", "sub/b.png", "a.png"]}),
     ("/api/pca", {}),
     ("/api/neighbours", {"id": "a.png", "k": 0})],
)
def test_bad_parameters_are_400(server, path, params):
    srv, _ = server
    status, body = get_json(srv, path, **params)
    assert status == 400
    assert body["error"]


def test_page_and_static_files(server):
    srv, _ = server
    status, body, ctype = request(srv, "/")
    assert status == 200 and ctype.startswith("text/html")
    assert b'id="upload"' in body
    assert request(srv, "/static/app.js")[0] == 200
    assert request(srv, "/static/../serve.py")[0] == 404
    assert request(srv, "/static/__init__.py")[0] == 404
    assert request(srv, "/nothing")[0] == 404


def test_serve_command_binds_loopback_by_default(run_viz, monkeypatch, tmp_path):
    from dinolab.viz import cli as viz_cli

    seen = {}
    monkeypatch.setattr(viz_cli, "serve", lambda cfg, model: seen.update(cfg=cfg))
    assert run_viz(["serve", "--root", str(tmp_path), "--max-upload-mb", "0.5", "--port", "0"]) == 0
    cfg = seen["cfg"]
    assert (cfg.host, cfg.port, cfg.root) == ("127.0.0.1", 0, str(tmp_path))
    assert cfg.explorer.max_upload_bytes == 512 * 1024


def test_serve_command_refuses_a_missing_root(run_viz, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_viz(["serve", "--root", str(tmp_path / "nowhere")])


# ------------------------------------------------------------------ big uploads, slow clients, odd files


def test_a_large_oversized_upload_gets_413_not_a_reset(server):
    """32 MiB (more than the sockets buffer) over a 3000-byte limit: the 413 must reach the client.

    Closing with the body unread resets the connection, and the client, still sending, sees a broken
    pipe instead of the answer; the server drains the body after answering.
    """
    srv, _ = server
    status, body = upload(srv, bytes(32 * 2**20))
    assert status == 413
    assert str(UPLOAD_LIMIT) in body["error"]
    assert get_json(srv, "/api/images")[0] == 200  # the server is still serving


def _raw_connection(srv):
    import socket

    return socket.create_connection(srv.server_address[:2], timeout=10)


@pytest.mark.parametrize("sent", [b"", b"GET /api/images HTTP/1.1\r\nHost: x\r\n"])
def test_a_silent_client_is_disconnected_after_the_timeout(server, monkeypatch, sent):
    import time

    from dinolab.viz.serve import ExplorerHandler

    srv, _ = server
    assert 10 <= ExplorerHandler.timeout <= 120  # the default: a few tens of seconds
    monkeypatch.setattr(ExplorerHandler, "timeout", 0.5)
    with _raw_connection(srv) as sock:
        sock.sendall(sent)  # nothing, or a request whose headers never end
        start = time.monotonic()
        assert sock.recv(4096) == b""  # the server closed it (a hang would raise socket.timeout after 10 s)
        assert time.monotonic() - start < 5
    assert get_json(srv, "/api/images")[0] == 200


def test_a_stalled_upload_body_is_dropped_after_the_timeout(server, monkeypatch):
    import time

    from dinolab.viz.serve import ExplorerHandler

    srv, _ = server
    monkeypatch.setattr(ExplorerHandler, "timeout", 0.5)
    with _raw_connection(srv) as sock:
        sock.sendall(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
                     b"only a few bytes")
        start = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert time.monotonic() - start < 5
    assert answer.startswith(b"HTTP/1.1 408")


@pytest.fixture
def odd_server(tmp_path, tiny_model, monkeypatch, make_fifo):
    """An explorer over {a.png, a_copy.png, bomb.png (a decompression bomb), pipe.png (a FIFO)}."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # PIL refuses more than 2 x 1500 pixels
    root = tmp_path / "root"
    root.mkdir()
    rng = np.random.default_rng(0)
    first = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))  # 1024 pixels: fine
    first.save(root / "a.png")
    first.save(root / "a_copy.png")
    bomb = png(Image.new("RGB", (64, 64), (9, 9, 9)))  # 4096 pixels > 3000
    (root / "bomb.png").write_bytes(bomb)
    make_fifo(root / "pipe.png")
    cfg = ServeConfig(root=str(root), host="127.0.0.1", port=0, quiet=True,
                      explorer=ExplorerConfig(size=32, max_upload_bytes=UPLOAD_LIMIT))
    srv = make_server(cfg, model=tiny_model)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, bomb
    srv.shutdown()
    srv.server_close()


def test_a_bomb_in_the_root_is_skipped_by_neighbours_and_refused_as_an_image(odd_server):
    srv, _ = odd_server
    assert get_json(srv, "/api/images") == (200, {"images": ["a.png", "a_copy.png", "bomb.png"]})  # no FIFO
    status, body = get_json(srv, "/api/neighbours", id="a.png", k=5)
    assert status == 200
    assert [n["id"] for n in body["neighbours"]] == ["a_copy.png"]
    status, body = get_json(srv, "/api/image", id="bomb.png")
    assert status == 415 and "cannot be read" in body["error"]
    status, body = get_json(srv, "/api/image", id="pipe.png")  # never opened
    assert status == 404


def test_an_uploaded_bomb_is_415(odd_server):
    srv, bomb = odd_server
    assert len(bomb) < UPLOAD_LIMIT
    status, body = upload(srv, bomb)
    assert status == 415 and body["error"]
    assert get_json(srv, "/api/neighbours", id="a.png", k=1)[0] == 200
