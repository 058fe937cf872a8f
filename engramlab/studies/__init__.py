"""Studies: several engram commands run as one job, each stage an ordinary run directory.

``stages`` runs a list of commands into OUT/<stage>/ and resumes an interrupted study at the
first unfinished stage; ``continual`` is the continual pre-training study (``engram continual``).
"""
