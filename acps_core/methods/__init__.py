"""The three kinds of method and how they are found: the base classes plugins subclass, the pluggy hook
specifications, the registry that maps names to classes, and the loader of ``acps`` entry points."""
