"""A small fake Google Cloud Storage server for tests: `gs://` paths that are not the local disk.

The server speaks the subset of the GCS JSON API that our two GCS clients use, over plain HTTP on
127.0.0.1, and holds every object in memory (nothing is written to disk):

- gcsfs (through fsspec, which `etils.epath` uses for `gs://` when TensorFlow is absent or
  `EPATH_USE_TF=false`): it reads `STORAGE_EMULATOR_HOST`; anonymous access comes from fsspec's
  configuration (`token='anon'`).
- TensorStore's `gcs` kvstore driver (orbax writes array data with it): `TENSORSTORE_GCS_HTTP_URL`
  points it here and `GOOGLE_AUTH_TOKEN_FOR_TESTING` gives it a fixed bearer token, so it never
  looks for credentials.
- google-cloud-storage (orbax asks it whether a bucket has a hierarchical namespace): it also reads
  `STORAGE_EMULATOR_HOST` and is then anonymous.

The metadata-server variables (`GCE_METADATA_ROOT`, `GCE_METADATA_HOST`, `GCE_METADATA_IP`) point
here too, so a client that did go looking for GCE credentials would get a 404 from 127.0.0.1
instead of waiting on the network; such requests are logged and a test can assert there were none.

API subset (https://cloud.google.com/storage/docs/json_api/v1), object names percent-encoded:
  GET    /storage/v1/b/B                          bucket resource (no hierarchical namespace)
  GET    /storage/v1/b/B/o                        list: prefix, delimiter, startOffset, endOffset,
                                                  maxResults, pageToken
  GET    /storage/v1/b/B/o/O                      metadata, or the bytes with alt=media (Range:
                                                  bytes=a-b, a-, -n answered with 206); also
                                                  under /download/storage/v1/ (gcsfs reads there)
  DELETE /storage/v1/b/B/o/O                      204
  POST   /storage/v1/b/B/o/O/rewriteTo/b/B2/o/O2  copy in one call (done: true)
  POST   /storage/v1/b/B/o/O/moveTo/o/O2          rename within a bucket
  POST   /upload/storage/v1/b/B/o                 uploadType=media | multipart | resumable; the
                                                  resumable session takes its chunks by POST or
                                                  PUT with Content-Range and answers 308 until the
                                                  last one
Preconditions `ifGenerationMatch` (0 means "does not exist") and `ifGenerationNotMatch` are honoured
on reads (412 / 304), uploads and deletes (412). Every write gets a new, increasing generation.
Not implemented (501): batch requests (gcsfs batches deletes only against storage.googleapis.com),
copyTo, compose, PATCH, cancelling an upload session, ACLs, object versions, bucket create/list,
chunked request bodies (411), the XML API; query parameters that would change the answer
(`generation`, `ifMetagenerationMatch`, `matchGlob`, ...) are refused with 501, not ignored.

Use: the `fake_gcs` fixture in conftest.py yields `'gs://test-bucket'` with the environment set,
or by hand:

    server = FakeGcsServer().start()
    deactivate = activate(server)   # before the first GCS use in this process (see below)
    ...                             # or `with serving() as server:`
    deactivate(); server.stop()

Child processes: `server.env()` holds everything a child needs (the fsspec token and gcsfs switch
included, as `FSSPEC_GCS_TOKEN` and `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`), so pass it in the
child's environment; the server must run as long as the child does.

In-process caveats, handled by `activate()`:
- TensorStore resolves its credentials once per process, so `GOOGLE_AUTH_TOKEN_FOR_TESTING` must be
  set before the first `gs://` TensorStore operation; keep one server (one port) per process,
  since TensorStore may cache opened drivers with their URL.
- fsspec reads `FSSPEC_*` variables only at import, so `activate()` also writes the token into
  `fsspec.config.conf`, and clears fsspec's and etils' cached filesystem instances.
- gcsfs caches folder listings per filesystem instance: after a process has listed a folder,
  objects that another client (TensorStore, another process) writes there stay invisible to
  its `exists`/`iterdir` (real GCS behaves the same way under gcsfs; see
  test_fake_gcs.py). `use_listings_cache=False` in fsspec's config turns the cache off.
- gcsfs >= 2026 by default picks its "extended" filesystem, which asks a gRPC storage-control
  API for the bucket type; this server has no gRPC, so `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`
  must be set before gcsfs is imported (`activate()` also re-registers the plain class if it was).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import hashlib
import http.server
import itertools
import json
import os
import re
import sys
import threading
import time
import urllib.parse

BUCKET = 'test-bucket'


@dataclasses.dataclass(frozen=True)
class Blob:
  data: bytes
  generation: int
  content_type: str
  created: float
  metadata: dict | None = None


class HttpError(Exception):

  def __init__(self, status, message=''):
    super().__init__(message)
    self.status = status
    self.message = message


def _rfc3339(t):
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
      '%Y-%m-%dT%H:%M:%S.%f')[:-3] + 'Z'


def _json(status, obj, headers=None):
  return status, {'Content-Type': 'application/json; charset=UTF-8', **(headers or {})}, (
      json.dumps(obj).encode())


def _split_part(part):
  """A MIME part between two delimiters -> (headers text, body bytes). The line break that
  follows the boundary (CRLF, or LF as gcsfs writes) also precedes the next one: not body."""
  eol = b'\r\n' if part.startswith(b'\r\n') else b'\n'
  part = part[len(eol):]
  if part.endswith(eol):
    part = part[:-len(eol)]
  m = re.search(rb'\r?\n\r?\n', part)
  if m is None:
    return part.decode('latin-1'), b''
  return part[:m.start()].decode('latin-1'), part[m.end():]


def _multipart(content_type, body):
  m = re.search(r'boundary="?([^";]+)"?', content_type or '')
  if m is None:
    raise HttpError(400, f'no multipart boundary in {content_type!r}')
  pieces = body.split(b'--' + m.group(1).encode())
  # pieces[0] is the preamble, the last one starts with '--' (the closing delimiter).
  return [_split_part(p) for p in pieces[1:] if not p.startswith(b'--')]


class FakeGcsServer:
  """GCS JSON API on 127.0.0.1 over an in-memory object store; see the module docstring."""

  def __init__(self, buckets=(BUCKET,)):
    self.buckets = set(buckets)
    self.objects: dict[tuple[str, str], Blob] = {}
    self.log: list[tuple[str, str, str]] = []  # (method, path, user agent) of every request
    self._uploads: dict[str, dict] = {}
    self._lock = threading.RLock()
    self._generation = itertools.count(int(time.time() * 1e6))
    self._httpd = None
    self._thread = None

  # ----- lifetime and environment -----

  def start(self) -> FakeGcsServer:
    self._httpd = _Server(('127.0.0.1', 0), _Handler)
    self._httpd.fake = self
    self._thread = threading.Thread(target=self._httpd.serve_forever, name='fake-gcs',
                                    daemon=True)
    self._thread.start()
    return self

  def stop(self):
    if self._httpd is not None:
      self._httpd.shutdown()
      self._httpd.server_close()
      self._thread.join()
      self._httpd = None

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self._httpd.server_address[1]}'

  def env(self) -> dict[str, str]:
    """The environment variables that point every client (here or in a child) at this server."""
    host = self.url.removeprefix('http://')
    return {
        'STORAGE_EMULATOR_HOST': self.url,  # gcsfs, google-cloud-storage
        'EPATH_USE_TF': 'false',  # epath takes fsspec (gcsfs) for gs:// even if TF is installed
        'FSSPEC_GCS_TOKEN': 'anon',  # fsspec config for gcsfs, read when fsspec is imported
        'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # plain GCSFileSystem, no gRPC
        'TENSORSTORE_GCS_HTTP_URL': self.url,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-gcs-token',  # TensorStore: fixed bearer token
        'GCE_METADATA_ROOT': host,  # metadata server (TensorStore, google-auth): here, not GCE
        'GCE_METADATA_HOST': host,
        'GCE_METADATA_IP': host,
    }

  def reset(self):
    with self._lock:
      self.objects.clear()
      self._uploads.clear()
      self.log.clear()

  def names(self, bucket=BUCKET) -> list[str]:
    with self._lock:
      return sorted(n for b, n in self.objects if b == bucket)

  # ----- the API -----

  def handle(self, method, target, headers, body):
    """One request -> (status, headers, body)."""
    self.log.append((method, target, headers.get('User-Agent', '')))
    parsed = urllib.parse.urlsplit(target)
    q = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
    path = parsed.path
    try:
      if unsupported := sorted(set(q) & _UNSUPPORTED_PARAMS):
        raise HttpError(501, f'query parameters {unsupported} are not implemented by the fake')
      with self._lock:
        for pattern, methods, fn in _ROUTES:
          m = re.fullmatch(pattern, path)
          if m and method in methods:
            args = [urllib.parse.unquote(g) for g in m.groups()]
            return fn(self, *args, q=q, headers=headers, body=body)
      raise HttpError(501 if path.startswith(('/storage/', '/upload/', '/batch/')) else 404,
                      f'{method} {path} is not implemented by the fake')
    except HttpError as e:
      reason = {404: 'notFound', 412: 'conditionNotMet'}.get(e.status, 'invalid')
      return _json(e.status, {'error': {'code': e.status, 'message': e.message,
                                        'errors': [{'reason': reason, 'message': e.message}]}})

  def _resource(self, bucket, name, blob):
    md5 = base64.b64encode(hashlib.md5(blob.data).digest()).decode()
    r = {'kind': 'storage#object', 'id': f'{bucket}/{name}/{blob.generation}', 'name': name,
         'bucket': bucket, 'generation': str(blob.generation), 'metageneration': '1',
         'contentType': blob.content_type, 'size': str(len(blob.data)), 'md5Hash': md5,
         'storageClass': 'STANDARD', 'timeCreated': _rfc3339(blob.created),
         'updated': _rfc3339(blob.created)}
    if blob.metadata:
      r['metadata'] = blob.metadata
    return r

  def _bucket(self, bucket):
    if bucket not in self.buckets:
      raise HttpError(404, f'bucket {bucket} not found')
    return bucket

  def _get(self, bucket, name):
    blob = self.objects.get((self._bucket(bucket), name))
    if blob is None:
      raise HttpError(404, f'No such object: {bucket}/{name}')
    return blob

  @staticmethod
  def _check(blob, q):
    """The generation preconditions of `q` against `blob` (None: no live object)."""
    gen = 0 if blob is None else blob.generation
    if 'ifGenerationMatch' in q and int(q['ifGenerationMatch']) != gen:
      raise HttpError(412, f'ifGenerationMatch={q["ifGenerationMatch"]}, generation is {gen}')
    if 'ifGenerationNotMatch' in q and int(q['ifGenerationNotMatch']) == gen:
      raise HttpError(412, f'ifGenerationNotMatch={gen}')

  def _put(self, bucket, name, data, q, content_type=None, metadata=None):
    self._check(self.objects.get((self._bucket(bucket), name)), q)
    blob = Blob(bytes(data), next(self._generation), content_type or 'application/octet-stream',
                time.time(), metadata)
    self.objects[(bucket, name)] = blob
    return _json(200, self._resource(bucket, name, blob))

  def get_bucket(self, bucket, q, headers, body):
    self._bucket(bucket)
    now = _rfc3339(time.time())
    return _json(200, {'kind': 'storage#bucket', 'id': bucket, 'name': bucket, 'location': 'US',
                       'storageClass': 'STANDARD', 'metageneration': '1', 'timeCreated': now,
                       'updated': now})

  def list_objects(self, bucket, q, headers, body):
    self._bucket(bucket)
    prefix, delim = q.get('prefix', ''), q.get('delimiter', '')
    lo, hi = q.get('startOffset', ''), q.get('endOffset')
    entries = {}  # key -> object resource, or None for a prefix ("directory")
    for (b, name), blob in self.objects.items():
      if b != bucket or not name.startswith(prefix) or name < lo or (hi and name >= hi):
        continue
      cut = name.find(delim, len(prefix)) if delim else -1
      if cut >= 0:
        entries[name[:cut + len(delim)]] = None
      else:
        entries[name] = self._resource(bucket, name, blob)
    keys = [k for k in sorted(entries) if k > q.get('pageToken', '')]
    page = keys[:int(q.get('maxResults', 1000))]
    out = {'kind': 'storage#objects', 'items': [entries[k] for k in page if entries[k]],
           'prefixes': [k for k in page if entries[k] is None]}
    if len(page) < len(keys):
      out['nextPageToken'] = page[-1]
    return _json(200, out)

  def get_object(self, bucket, name, q, headers, body):
    blob = self.objects.get((self._bucket(bucket), name))
    if blob is None:
      raise HttpError(404, f'No such object: {bucket}/{name}')
    gen = blob.generation
    if 'ifGenerationNotMatch' in q and int(q['ifGenerationNotMatch']) == gen:
      return 304, {'x-goog-generation': str(gen)}, b''
    self._check(blob, {k: v for k, v in q.items() if k == 'ifGenerationMatch'})
    if q.get('alt') != 'media':
      return _json(200, self._resource(bucket, name, blob))
    md5 = self._resource(bucket, name, blob)['md5Hash']
    out = {'Content-Type': blob.content_type, 'x-goog-generation': str(gen),
           'x-goog-metageneration': '1', 'x-goog-stored-content-length': str(len(blob.data)),
           'x-goog-hash': f'md5={md5}', 'Accept-Ranges': 'bytes'}
    rng = headers.get('Range')
    if not rng:
      return 200, out, blob.data
    m = re.fullmatch(r'bytes=(\d*)-(\d*)', rng.strip())
    if m is None or m.groups() == ('', ''):
      raise HttpError(400, f'bad Range {rng!r}')
    n = len(blob.data)
    if m.group(1) == '':  # suffix: the last N bytes
      start, end = max(0, n - int(m.group(2))), n - 1
    else:
      start = int(m.group(1))
      end = min(n - 1, int(m.group(2))) if m.group(2) else n - 1
    if start >= n or start > end:
      return 416, {'Content-Range': f'bytes */{n}'}, b''
    out['Content-Range'] = f'bytes {start}-{end}/{n}'
    return 206, out, blob.data[start:end + 1]

  def delete_object(self, bucket, name, q, headers, body):
    self._check(self._get(bucket, name), q)
    del self.objects[(bucket, name)]
    return 204, {}, b''

  def rewrite(self, bucket, name, dst_bucket, dst_name, q, headers, body):
    src = self._get(bucket, name)
    _, _, out = self._put(dst_bucket, dst_name, src.data, q, src.content_type, src.metadata)
    size = str(len(src.data))
    return _json(200, {'kind': 'storage#rewriteResponse', 'done': True, 'objectSize': size,
                       'totalBytesRewritten': size, 'resource': json.loads(out)})

  def move(self, bucket, name, dst_name, q, headers, body):
    src = self._get(bucket, name)
    response = self._put(bucket, dst_name, src.data, q, src.content_type, src.metadata)
    del self.objects[(bucket, name)]
    return response

  def upload(self, bucket, q, headers, body):
    kind = q.get('uploadType', 'media')
    if 'upload_id' in q:
      return self._resume(bucket, q, headers, body)
    if kind == 'media':
      if 'name' not in q:
        raise HttpError(400, 'uploadType=media needs ?name=')
      return self._put(bucket, q['name'], body, q, headers.get('Content-Type'))
    if kind == 'multipart':
      parts = _multipart(headers.get('Content-Type'), body)
      if len(parts) != 2:
        raise HttpError(400, f'multipart upload with {len(parts)} parts, expected 2')
      meta = json.loads(parts[0][1])
      ctype = re.search(r'(?im)^content-type:\s*(.+?)\s*$', parts[1][0])
      return self._put(bucket, meta.get('name') or q['name'], parts[1][1], q,
                       meta.get('contentType') or (ctype and ctype.group(1)),
                       meta.get('metadata'))
    if kind == 'resumable':
      meta = json.loads(body) if body else {}
      name = meta.get('name') or q.get('name')
      if not name:
        raise HttpError(400, 'resumable upload without a name')
      self._check(self.objects.get((self._bucket(bucket), name)), q)  # fail early, as GCS does
      upload_id = os.urandom(8).hex()
      self._uploads[upload_id] = dict(
          name=name, data=bytearray(), q={k: v for k, v in q.items() if k.startswith('if')},
          content_type=meta.get('contentType') or headers.get('X-Upload-Content-Type'),
          metadata=meta.get('metadata'))
      location = (f'{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable'
                  f'&upload_id={upload_id}')
      return 200, {'Location': location}, b''
    raise HttpError(400, f'uploadType={kind} is not supported')

  def _resume(self, bucket, q, headers, body):
    up = self._uploads.get(q['upload_id'])
    if up is None:
      raise HttpError(404, f'no upload session {q["upload_id"]}')
    m = re.fullmatch(r'bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)', headers.get('Content-Range', '').strip())
    if m is None:
      raise HttpError(400, f'bad Content-Range {headers.get("Content-Range")!r}')
    if m.group(1) is not None and int(m.group(1)) == len(up['data']):
      up['data'] += body[:int(m.group(2)) - int(m.group(1)) + 1]
    total = None if m.group(3) == '*' else int(m.group(3))
    if total is not None and total == len(up['data']):
      del self._uploads[q['upload_id']]
      return self._put(bucket, up['name'], up['data'], up['q'], up['content_type'],
                       up['metadata'])
    have = len(up['data'])
    return 308, ({'Range': f'bytes=0-{have - 1}'} if have else {}), b''


# Parameters that would change the answer and that the fake does not implement: refused, not
# silently ignored.
_UNSUPPORTED_PARAMS = {'generation', 'sourceGeneration', 'versions', 'ifMetagenerationMatch',
                       'ifMetagenerationNotMatch', 'ifSourceGenerationMatch',
                       'ifSourceGenerationNotMatch', 'matchGlob', 'includeFoldersAsPrefixes'}
_NAME = r'([^/]+)'
_ROUTES = [
    (rf'/storage/v1/b/{_NAME}', {'GET'}, FakeGcsServer.get_bucket),
    (rf'/storage/v1/b/{_NAME}/o', {'GET'}, FakeGcsServer.list_objects),
    (rf'(?:/download)?/storage/v1/b/{_NAME}/o/{_NAME}', {'GET'}, FakeGcsServer.get_object),
    (rf'/storage/v1/b/{_NAME}/o/{_NAME}', {'DELETE'}, FakeGcsServer.delete_object),
    (rf'/storage/v1/b/{_NAME}/o/{_NAME}/rewriteTo/b/{_NAME}/o/{_NAME}', {'POST'},
     FakeGcsServer.rewrite),
    (rf'/storage/v1/b/{_NAME}/o/{_NAME}/moveTo/o/{_NAME}', {'POST'}, FakeGcsServer.move),
    (rf'/upload/storage/v1/b/{_NAME}/o', {'POST', 'PUT'}, FakeGcsServer.upload),
]


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 128  # TensorStore opens up to 32 connections at once

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hung up: not our error
      super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'  # keep-alive; Expect: 100-continue is answered by http.server
  disable_nagle_algorithm = True  # headers and body leave at once (no 40 ms delayed-ACK stall)

  def _serve(self):
    if self.headers.get('Transfer-Encoding'):  # neither client streams an upload
      self.send_error(411, 'the fake GCS server needs Content-Length')
      return
    body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
    status, headers, payload = self.server.fake.handle(self.command, self.path, self.headers,
                                                       body)
    self.send_response(status)
    for k, v in headers.items():
      self.send_header(k, v)
    self.send_header('Content-Length', str(len(payload)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(payload)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass


def clear_filesystem_caches():
  """Drops the gcsfs instances that fsspec and etils keep, so the next `gs://` use builds a new
  one from the current environment and `fsspec.config.conf`."""
  import fsspec  # pylint: disable=g-import-not-at-top
  import gcsfs  # pylint: disable=g-import-not-at-top
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  fsspec.get_filesystem_class('gs').clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def activate(server: FakeGcsServer, environ=os.environ):
  """Points this process's GCS clients at `server`; returns a function that undoes it."""
  saved = {k: environ.get(k) for k in server.env()}
  environ.update(server.env())
  import fsspec  # pylint: disable=g-import-not-at-top
  saved_conf = {p: dict(fsspec.config.conf[p]) if p in fsspec.config.conf else None
                for p in ('gcs', 'gs')}
  fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'
  import gcsfs  # pylint: disable=g-import-not-at-top
  saved_cls = fsspec.get_filesystem_class('gs')
  if saved_cls is not gcsfs.core.GCSFileSystem:  # gcsfs was imported before the switch was set
    for p in ('gs', 'gcs'):
      fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)

  clear_filesystem_caches()

  def deactivate():
    clear_filesystem_caches()
    for p in ('gs', 'gcs'):
      fsspec.register_implementation(p, saved_cls, clobber=True)
    for p, conf in saved_conf.items():
      if conf is None:
        fsspec.config.conf.pop(p, None)
      else:
        fsspec.config.conf[p] = conf
    for k, v in saved.items():
      if v is None:
        environ.pop(k, None)
      else:
        environ[k] = v

  return deactivate


@contextlib.contextmanager
def serving():
  """A started server, active in this process for the duration of the block."""
  server = FakeGcsServer().start()
  deactivate = activate(server)
  try:
    yield server
  finally:
    deactivate()
    server.stop()
