"""Example model repository and the reproducible training code that fills it.

``python -m models.train --repository models`` builds every version folder of
``fraud`` (XGBoost) and ``churn`` (scikit-learn exported to ONNX) from seeded
synthetic data; the same code and library versions give byte-identical
artifacts, holdout files and reference profiles.
"""
