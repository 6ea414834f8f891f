// The page works without this script (the form is a plain GET form). With it: fields left empty stay out of
// the address, a changed choice estimates at once, and a config.json can be uploaded as the model.
(function () {
  var form = document.getElementById("plan");
  if (!form) return;
  form.addEventListener("formdata", function (event) {
    var empty = [];
    event.formData.forEach(function (value, key) { if (value === "") empty.push(key); });
    empty.forEach(function (key) { event.formData.delete(key); });
  });
  form.querySelectorAll("select").forEach(function (select) {
    select.addEventListener("change", function () { form.requestSubmit(); });
  });
  var upload = document.getElementById("upload");
  upload.addEventListener("change", function () {
    var file = upload.files[0];
    var error = document.getElementById("error-model");
    if (!file) return;
    file.text().then(function (text) {
      return fetch("/api/upload", {method: "POST", headers: {"Content-Type": "application/json"}, body: text});
    }).then(function (response) {
      return response.json();
    }).then(function (answer) {
      if (answer.error) { error.textContent = answer.error; return; }
      document.getElementById("f-model").value = answer.model;
      form.requestSubmit();
    }).catch(function (err) { error.textContent = "upload failed: " + err; });
  });
})();
