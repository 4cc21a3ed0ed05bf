"""The method, pure PyTorch (no Ray, MLflow or files): composition maths, prompt bank, private prompts,
routers, initialisers."""
