"""Above the stages, the only part that imports them: ``alignkit run`` (the whole loop, ``run.py``,
with its index page in ``index.py``) and ``alignkit chat`` (``chat.py``: the evals stage's chat with
the annotation stage's Argilla push of the arena's picks)."""
