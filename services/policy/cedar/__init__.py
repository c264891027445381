"""The Cedar engine behind the policy service's :class:`~services.policy.decider.Decider`.

Import each name from the module that defines it (this package re-exports nothing):

* :mod:`~services.policy.cedar.policy_set`: a policy set (a folder or its
  texts: the Cedar schema and ``*.cedar`` files) read, parsed, validated and
  compiled (:class:`~services.policy.cedar.policy_set.CedarPolicies`); the
  shipped set (:func:`~services.policy.cedar.policy_set.shipped_policy_dir`);
* :mod:`~services.policy.cedar.slicing`: which policies of a set can apply
  to a request, and what of its context they can observe;
* :mod:`~services.policy.cedar.entities`: Cedar entities built from registry
  records and requests, and their cache;
* :mod:`~services.policy.cedar.decider`: the decider
  (:class:`~services.policy.cedar.decider.CedarDecider`), turning Cedar's
  answers into decisions, memoized;
* :mod:`~services.policy.cedar.engine`: calling Cedar, the only module that
  touches cedarpy's private extension.
"""
