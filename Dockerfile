# Two stages: build the wheel and the example models, then a slim non-root runtime.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY loadtest ./loadtest
COPY models ./models
RUN pip install --no-cache-dir build \
 && python -m build --wheel --outdir /wheels \
 && pip install --no-cache-dir /wheels/*.whl 'scikit-learn>=1.4' 'skl2onnx>=1.17' 'onnx>=1.16' \
 && python -m models.train --repository /src/models

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 sluice
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY --from=build --chown=sluice:sluice /src/models /models
USER sluice
ENV SLUICE_MODEL_REPOSITORY=/models \
    SLUICE_HOST=0.0.0.0 \
    SLUICE_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import os,urllib.request,sys; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"SLUICE_PORT\"]}/v2/health/ready', timeout=2).status == 200 else 1)"
CMD ["sluice", "serve"]
