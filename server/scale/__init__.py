"""Scale-out: N engine replicas as Ray Serve deployments behind one ingress (``loraserve serve-ray``).

Ray-free modules (``router``, ``forward``, ``replicas``, ``ingress``, ``prom``) hold the logic and are tested
without a cluster; ``deployments`` wraps them as Ray Serve deployments and ``launch`` runs them.
"""
