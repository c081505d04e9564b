"""A Cloud Storage emulator on 127.0.0.1 for the gs:// tests, complete enough for orbax.

    python -m tests.gcs_emulator DATA_DIR PORT BUCKET      # serves until SIGTERM

gcp-storage-emulator serves the GCS JSON API, but orbax's array store (TensorStore) and gcsfs
need four things it lacks: the `x-goog-generation` header on reads, the `ifGenerationMatch` /
`ifGenerationNotMatch` preconditions, `startOffset` / `endOffset` when listing, and `moveTo`.
They are added here by wrapping its request handlers at run time (the installed package is not
edited), with ranged reads served from the stored file (the emulator reads a whole object for
each, which makes restoring a large checkpoint quadratic). Requests are served by several threads, one at a time, so that a precondition and the
write it guards cannot interleave with another request.

`Emulator` (for the tests) starts the server in a network namespace that has only a loopback
device where one can be made (root and `ip netns`), runs the test's commands in that namespace
with every variable that points the storage libraries at the emulator and keeps Google's
authentication libraries off the network, and stops and removes it all afterwards.
"""

import faulthandler
import functools
import http
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _query(request, name):
  values = request.query.get(name)
  return values[0] if values else None


def _precondition_failed(request, storage, bucket, name) -> int | None:
  """The status a request's ifGenerationMatch / ifGenerationNotMatch give, or None to go on."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  match, not_match = _query(request, 'ifGenerationMatch'), _query(request, 'ifGenerationNotMatch')
  if match is None and not_match is None:
    return None
  try:
    generation = storage.get_file_obj(bucket, name)['generation']
  except NotFound:
    generation = '0'  # GCS: generation 0 matches an object that does not exist.
  if match is not None and match != generation:
    return http.HTTPStatus.PRECONDITION_FAILED
  if not_match is not None and not_match == generation:
    # A read answers "not modified"; a write or delete fails its precondition.
    return (http.HTTPStatus.NOT_MODIFIED if request.method == 'GET'
            else http.HTTPStatus.PRECONDITION_FAILED)
  return None


def _object_name(request, storage):
  params = request.params or {}
  if 'object_id' in params:
    return params['object_id']
  name = _query(request, 'name')
  if name is None and _query(request, 'upload_id'):  # A resumable upload's later requests.
    name = storage.get_resumable_file_obj(_query(request, 'upload_id'))['name']
  if name is None and isinstance(request.data, dict):
    name = (request.data.get('meta') or request.data).get('name')
  return name


def _with_preconditions(handler):
  """Checks the request's preconditions first; reads get their generation headers."""

  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    bucket = request.params['bucket_name']
    name = _object_name(request, storage)
    if name is not None:
      status = _precondition_failed(request, storage, bucket, name)
      if status is not None:
        response.status = status
        return None
    result = handler(request, response, storage, *args, **kwargs)
    if request.method == 'GET' and name is not None and response.status < 300:
      try:
        obj = storage.get_file_obj(bucket, name)
      except Exception:  # pylint: disable=broad-except  (the handler has said why)
        return result
      response['x-goog-generation'] = obj['generation']
      response['x-goog-metageneration'] = obj['metageneration']
    return result

  return wrapped


def _list_with_offsets(handler):
  """Honours startOffset (inclusive) and endOffset (exclusive) of an object listing."""

  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    result = handler(request, response, storage, *args, **kwargs)
    start, end = _query(request, 'startOffset'), _query(request, 'endOffset')
    if response.status < 300 and (start or end):
      listing = json.loads(response._content)  # pylint: disable=protected-access
      listing['items'] = [o for o in listing.get('items') or []
                          if (not start or o['name'] >= start) and (not end or o['name'] < end)]
      response.json(listing)
    return result

  return wrapped


def _ranged_reads(handler):
  """Serves a ranged read from the stored file (the emulator reads the whole object for each)."""

  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
    match = re.fullmatch(r'\s*bytes=(\d+)-(\d*)', request.get_header('range') or '')
    if match is None:
      return handler(request, response, storage, *args, **kwargs)
    bucket, name = request.params['bucket_name'], request.params['object_id']
    try:
      obj = storage.get_file_obj(bucket, name)
    except NotFound:
      response.status = http.HTTPStatus.NOT_FOUND
      return None
    size, start = int(obj['size']), int(match.group(1))
    end = min(size, int(match.group(2)) + 1) if match.group(2) else size
    # pylint: disable-next=protected-access
    with open(storage._store._disk_path(storage._object_path(bucket, name)), 'rb') as f:
      f.seek(start)
      data = f.read(max(0, end - start))
    response['Content-Range'] = f'bytes {start}-{end - 1}/{size}'
    response.status = http.HTTPStatus.PARTIAL_CONTENT
    response.write_file(data, content_type=obj.get('contentType'))
    return None

  return wrapped


def _move(request, response, storage, *args, **kwargs):
  """objects.moveTo within a bucket: the destination appears whole, then the source goes."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  bucket, source = request.params['bucket_name'], request.params['object_id']
  destination = request.params['dest_object_id']
  status = _precondition_failed(request, storage, bucket, destination)
  if status is not None:
    response.status = status
    return
  try:
    # pylint: disable-next=protected-access
    moved = objects._copy(request.base_url, storage, bucket, source, bucket, destination)
    storage.delete_file(bucket, source)
  except NotFound:
    response.status = http.HTTPStatus.NOT_FOUND
    return
  response.json(moved)


def _install() -> None:
  """Wraps the emulator's handlers (in this process) and adds the moveTo route."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator import settings  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download
  objects.download = _ranged_reads(download)  # Also what objects.get calls for alt=media.
  guarded = {objects.get, download, objects.insert, objects.upload_partial, objects.delete,
             objects.xml_upload}
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in guarded:
        handlers[method] = _with_preconditions(objects.download if handler is download
                                               else handler)
      elif handler is objects.ls:
        handlers[method] = _list_with_offsets(handler)
  move = (rf'^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)'
          r'/moveTo/o/(?P<dest_object_id>.*[^/]+)$')
  server.HANDLERS = ((move, {'POST': _move}),) + tuple(server.HANDLERS)


def serve(data_dir: str, port: int, bucket: str) -> None:
  """Runs the emulator on 127.0.0.1:`port` with `bucket`, until SIGTERM."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  _install()
  emulator = server.create_server('127.0.0.1', port, in_memory=False, default_bucket=bucket,
                                  data_dir=data_dir)
  lock = threading.Lock()
  handle = server.Router.handle
  server.Router.handle = lambda self, method: _locked(lock, handle, self, method)
  emulator._api.run = lambda: _run_threaded(emulator._api, port)  # pylint: disable=protected-access
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  faulthandler.register(signal.SIGUSR1)  # `kill -USR1` shows where a stuck server waits.
  emulator.start()
  print('ready', flush=True)
  try:
    while True:
      time.sleep(3600)
  finally:
    emulator.stop()


def _locked(lock, handle, router, method):
  with lock:
    return handle(router, method)


def _run_threaded(api, port):
  """The emulator's server loop, accepting connections on threads (TensorStore opens many)."""
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  # pylint: disable=protected-access
  api._httpd = http.server.ThreadingHTTPServer(
      ('127.0.0.1', port), functools.partial(server.RequestHandler, api._storage))
  api.is_running.set()
  api._httpd.serve_forever()


def _can_make_namespace() -> bool:
  return (hasattr(os, 'geteuid') and os.geteuid() == 0 and shutil.which('ip') is not None
          and sys.platform.startswith('linux'))


class Emulator:
  """The emulator, started on a free port (in its own loopback-only network namespace if it can
  be made); `command` and `run` place a test's processes beside it. A context manager."""

  def __init__(self, data_dir: str, bucket: str = 'bucket'):
    self.data_dir, self.bucket = str(data_dir), bucket
    self.namespace = f'repmlp-gcs-{secrets.token_hex(4)}' if _can_make_namespace() else None
    self.port = None
    self._process = None

  def __enter__(self) -> 'Emulator':
    if self.namespace:
      subprocess.run(['ip', 'netns', 'add', self.namespace], check=True)
      subprocess.run(self._prefix() + ['ip', 'link', 'set', 'lo', 'up'], check=True)
      self.port = 9023  # A new namespace has no other listener.
    else:
      with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        self.port = s.getsockname()[1]
    # Its log goes to a file: a pipe nobody reads would fill and stop the server mid-request.
    self.log = f'{self.data_dir.rstrip(os.sep)}.log'
    with open(self.log, 'w', encoding='utf-8') as log:
      self._process = subprocess.Popen(
          self.command([sys.executable, '-m', 'tests.gcs_emulator', self.data_dir,
                        str(self.port), self.bucket]),
          cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while 'ready' not in open(self.log, encoding='utf-8').read().splitlines():
      if self._process.poll() is not None or time.time() > deadline:
        self.__exit__(None, None, None)
        raise RuntimeError(f'The storage emulator did not start; see {self.log}.')
      time.sleep(0.1)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._process is not None:
      self._process.terminate()
      self._process.wait(timeout=30)
    if self.namespace:
      subprocess.run(['ip', 'netns', 'delete', self.namespace], check=False)

  def _prefix(self) -> list[str]:
    return ['ip', 'netns', 'exec', self.namespace] if self.namespace else []

  def url(self, path: str = '') -> str:
    """gs://<bucket>/<path>."""
    return f'gs://{self.bucket}/{path}'.rstrip('/')

  def env(self) -> dict[str, str]:
    """The environment of a process that uses the emulator and nothing of Google's."""
    endpoint = f'http://127.0.0.1:{self.port}'
    no_metadata_server = '127.0.0.1:1'
    return {**os.environ, 'PYTHONPATH': ROOT,
            'STORAGE_EMULATOR_HOST': endpoint,  # gcsfs
            'FSSPEC_GCS_TOKEN': 'anon',
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # else a gRPC probe per bucket
            'EPATH_USE_TF': 'false',  # tf.io.gfile cannot be pointed at an emulator
            'TENSORSTORE_GCS_HTTP_URL': endpoint,  # orbax's arrays
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'dummy',
            'GOOGLE_CLOUD_PROJECT': 'test',
            'NO_GCE_CHECK': 'true',
            'GCE_METADATA_HOST': no_metadata_server, 'GCE_METADATA_IP': no_metadata_server,
            'GCE_METADATA_ROOT': no_metadata_server}

  def command(self, argv: list[str]) -> list[str]:
    """`argv` run beside the emulator (in its network namespace, if it has one)."""
    return self._prefix() + list(argv)

  def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
    """Starts `argv` beside the emulator, with its environment; output captured as text."""
    return subprocess.Popen(self.command(argv), cwd=ROOT, env={**self.env(), **kwargs.pop(
        'env', {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)

  def run(self, argv: list[str], timeout: float = 900, **kwargs) -> tuple[int, str]:
    """Runs `argv` beside the emulator to the end: (exit status, output)."""
    process = self.popen(argv, **kwargs)
    out = process.communicate(timeout=timeout)[0]
    return process.returncode, out

  def stored(self, name: str) -> str:
    """Where the emulator keeps the bytes of object `name` (for reading them in a test)."""
    return os.path.join(self.data_dir, '.cloudstorage', self.bucket, *name.split('/'))


if __name__ == '__main__':
  serve(sys.argv[1], int(sys.argv[2]), sys.argv[3])
