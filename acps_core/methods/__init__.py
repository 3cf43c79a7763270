"""The three kinds of method and how they are found and configured: the base classes plugins subclass
(``bases``), the pluggy hook specifications (``hookspecs``), the loader of ``acps`` entry points (``loading``), the
registry that maps names to classes (``registry``), method specs ``Name(option=value, ...)`` (``spec``), the options
models that check them (``options``), turning a user's argument into a method (``resolve``), and the ``acps
plugins`` table (``table``)."""
