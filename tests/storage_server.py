"""A real Google Cloud Storage server on 127.0.0.1 for the tests: the `gcp-storage-emulator`
package's, started as a subprocess on a free port (objects in memory), and the environment that
points every library of a run at it (docs/cloud.md says which setting is whose).

One gap of the emulator (2026.7.19) is filled in the child: its object downloads carry no
`x-goog-generation` header, which GCS always sends and TensorStore reads to know the
generation it read (without it, orbax's second array write into an OCDBT database fails with
"Malformed StorageGeneration"). The header is added from the object's own record.

    with GcsServer(buckets=("bucket",)) as server:
      env = dict(os.environ, **server.env)     # for a child `python -m swinv2_jax.main`
      server.objects("bucket", "run/")         # names, listed by the server's JSON API
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

START_TIMEOUT_S = 30


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """The emulator as a context manager: started (bounded wait) on entry, killed on exit."""

  def __init__(self, buckets=("bucket",)):
    self.buckets = tuple(buckets)
    self.process = None
    self.url = ""
    self._log = None

  @property
  def env(self) -> dict[str, str]:
    """Environment variables that send each library's gs:// traffic to this server."""
    return {
        # gcsfs: etils.epath (the run's files, orbax's directories and metadata, tfds').
        "STORAGE_EMULATOR_HOST": self.url,
        # TensorStore's gcs kvstore (orbax's arrays), with a fixed bearer token in place of
        # application default credentials.
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # google-cloud-cpp inside array_record (tfds data read from the bucket).
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        # etils.epath through fsspec, not tf.io.gfile (swinv2_jax.paths sets it too).
        "EPATH_USE_TF": "false",
        # gcsfs asks the Storage Control gRPC API for each bucket's layout, which the emulator
        # does not serve: the plain JSON API only.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }

  def __enter__(self) -> "GcsServer":
    port = _free_port()
    self.url = f"http://127.0.0.1:{port}"
    # The emulator prints a traceback for every connection a client closes early: kept in a
    # file, shown only when it fails to start.
    self._log = tempfile.TemporaryFile(mode="w+")
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(port)],
        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
      try:
        urllib.request.urlopen(self.url + "/", timeout=1).close()
        break
      except OSError:
        if self.process.poll() is not None or time.monotonic() > deadline:
          self.__exit__()
          self._log.seek(0)
          raise RuntimeError(f"the storage emulator did not start on {self.url} within "
                             f"{START_TIMEOUT_S} s:\n{self._log.read()[-3000:]}")
        time.sleep(0.1)
    for bucket in self.buckets:
      self._request("POST", "/storage/v1/b?project=test", {"name": bucket})
    return self

  def __exit__(self, *exc) -> None:
    if self.process is not None and self.process.poll() is None:
      os.killpg(self.process.pid, signal.SIGKILL)
      self.process.wait()

  def _request(self, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
      return response.read()

  def list_buckets(self) -> list[str]:
    page = json.loads(self._request("GET", "/storage/v1/b?project=test"))
    return sorted(b["name"] for b in page.get("items", []))

  def objects(self, bucket: str, prefix: str = "") -> list[str]:
    """The names of the objects under `prefix`, as the server lists them (every page)."""
    names, token = [], None
    while True:
      query = {"prefix": prefix, **({"pageToken": token} if token else {})}
      page = json.loads(self._request(
          "GET", f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"))
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, bucket: str, name: str) -> bytes:
    """An object's content, downloaded from the server."""
    quoted = urllib.parse.quote(name, safe="")
    return self._request("GET", f"/storage/v1/b/{bucket}/o/{quoted}?alt=media")


def _serve(port: int) -> None:
  """Runs the emulator in this process (the child), its downloads with the generation header."""
  from gcp_storage_emulator import server as emulator  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      record = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = record["generation"]
      response["x-goog-metageneration"] = record["metageneration"]

  objects.download = download_with_generation  # objects.get (?alt=media) calls it by name
  for _, methods in emulator.HANDLERS:  # the routes that name it directly
    for method, handler in methods.items():
      if handler is download:
        methods[method] = download_with_generation
  emulator.create_server("127.0.0.1", port, in_memory=True).run()


if __name__ == "__main__":
  _serve(int(sys.argv[1]))
