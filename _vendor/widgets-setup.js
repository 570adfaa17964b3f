// Runs before require.js and embed-amd.js on pages that hold saved widgets.
(function () {
  // embed-amd.js derives the URL of its Font Awesome files from the requirejs
  // URL of the module '@jupyter-widgets/html-manager', which by default lies in
  // the page's own folder.  A global `require` object set before require.js
  // loads is its configuration: map the module next to embed-amd.js.
  var here = document.currentScript.src.replace(/[?#].*$/, '').replace(/[^/]*$/, '');
  window.require = {paths: {
    '@jupyter-widgets/html-manager': here + 'html-manager/embed-amd',
    '@jupyter-widgets/html-manager/dist': here + 'html-manager',
  }};
  // The same for the CSS bundled with the widget manager itself.
  window.__jupyter_widgets_assets_path__ = here + 'html-manager/';

  // html-manager 1.0 typesets widget labels through the MathJax 2 API
  // (MathJax.Hub.Queue) and throws on pages with MathJax 3, which has no Hub.
  // Map the call onto MathJax 3 once its deferred script has run; labels then
  // render \( \) math (MathJax 3 does not treat $ as a delimiter by default).
  document.addEventListener('DOMContentLoaded', function () {
    var mj = window.MathJax;
    if (!mj || mj.Hub || !mj.startup || !mj.startup.promise) return;
    mj.Hub = {
      Queue: function (command) {
        var element = command && command[2];
        if (!element) return;
        // Sphinx marks the page body mathjax_ignore; labels opt back in.
        element.classList.add('mathjax_process');
        mj.startup.promise
          .then(function () { return mj.typesetPromise([element]); })
          .catch(function (err) { console.error('MathJax could not typeset a widget label:', err); });
      },
    };
  });
})();
